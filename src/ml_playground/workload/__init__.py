"""What the flows train: a small GPT (``model``) and the bundled character corpus it learns (``data``)."""
