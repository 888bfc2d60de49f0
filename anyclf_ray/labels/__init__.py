"""Labels: the label scheme (one label a row or a label set, ``scheme``) and what it stands on:
label sets and their prior, contrastive pairs, metrics."""
