"""One module per messaging pattern, each over the envelope/codec core."""
