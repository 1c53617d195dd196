"""Where examples come from, how they are encoded, and how clients split them."""
