"""Models from files and into files: our, official and Hugging Face checkpoints
(:mod:`.model`: read_content, load_model, init_from, save_checkpoint), and the Hugging Face
mapping of config.json (:mod:`.hf_config`) and weight names (:mod:`.hf_weights`)."""
