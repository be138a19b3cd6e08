"""What a pretrained encoder is worth: its embeddings (`embed`), the weighted
kNN classifier (`knn`) and the linear probe (`linear`)."""
