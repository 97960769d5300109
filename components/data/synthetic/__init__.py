"""Procedural industrial products for ``contad data synth``: textures, objects, defects, designs."""
