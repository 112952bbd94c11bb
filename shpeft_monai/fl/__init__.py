"""Federated SH-PEFT glue (as ``monai.fl``): a hospital site trains by running the bundle; the server
aggregates only the agreed sparse coordinates. Flower-specific modules import ``flwr`` lazily."""
