"""The pretraining loop (`trainer`) and where its metrics go (`metrics`)."""
