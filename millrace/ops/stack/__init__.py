"""The local plant that `millrace up` runs under .millrace/."""
