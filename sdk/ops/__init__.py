"""Building blocks for methods: clustering, pseudo-labels, augmentation, optimisers."""
