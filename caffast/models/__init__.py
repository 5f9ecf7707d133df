"""Models as the commands and the reference scripts load them."""
