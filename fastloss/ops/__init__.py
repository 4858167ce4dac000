"""Public functions: validate, choose the kernel, shape the result."""
