"""The networks: dropfit's own and the recipe's (`networks`), pretrained backbones (`backbones`), and dropfit's Keras
layers (`layers`: training-time augmentation, and what old models need to load)."""
