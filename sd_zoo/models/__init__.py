"""The networks: the stochastic-depth mechanism, the ResNet families and their timm registration."""
