"""The module layer: the AIM model, the top-down masking pathway, the loss and the backbones."""
