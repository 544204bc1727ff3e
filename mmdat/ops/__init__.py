"""mmdat's operators: one dispatcher per op, implementations side by side."""
