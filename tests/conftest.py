"""Shared test settings: one intra-op thread, so small-tensor tests are fast and repeatable on 2 cores."""
import torch

torch.set_num_threads(1)
