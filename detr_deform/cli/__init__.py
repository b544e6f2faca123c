"""The command line: composing a validated Config from argv (:mod:`.compose`) and the
torchrun wrapper with the shell's exit status (:mod:`.launch`)."""
