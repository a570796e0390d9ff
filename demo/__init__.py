"""The main job a new user runs (``baton demo``): everything Baton has, on one machine. It sits above the other
packages and may use all of them."""
