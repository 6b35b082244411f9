"""Files: GGUF (checked reader, atomic writer) and safetensors/npz conversion."""
