"""Degradation synthesis on the device: what an op declares (`op`), the ops themselves, one
module each (`ops/`, the table the types, configs, suite and preview derive from), the `Degrader`
that chains them (`composer`), the GIR suite (`suite`) and pictures of them (`preview`). Importing
the package loads none of them."""
