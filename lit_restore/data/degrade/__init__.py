"""Degradation synthesis on the device: ops, the `Degrader` that composes them (`composer`), the
GIR suite. Importing the package loads none of them, so inference can read the type names
(`types`) without the synthesis code."""
