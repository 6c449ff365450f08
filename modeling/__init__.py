"""Models of vlmheads and the heads they share."""
