"""Model definitions and weight loading for the Llama family."""
