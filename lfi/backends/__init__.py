"""Backend implementations of the ops; lfi._dispatch chooses among them."""
