"""What runs from the shell: the caffast command and dataset runs."""
