"""Publishing: Hugging Face Hub folders and their model cards."""
