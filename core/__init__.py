"""The bottom layer: user errors, distributed helpers and seeding. Every other package may
import it; it imports none of them."""
