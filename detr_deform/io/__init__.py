"""File formats: our checkpoint files (safe read, atomic write, checksums) and Hugging Face
folders as files. Imports no model code (docs/architecture.md)."""
