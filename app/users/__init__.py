"""Managing users (admin): list, promote or demote, delete."""
