"""One module per file format sdtrain reads or writes (docs/formats.md)."""

# The precisions a file's weights are written in, as recipes and commands name them. Here, without torch, so
# that building the command line and reading a recipe import no library; safetensors_file.DTYPES maps them
# to torch's dtypes.
DTYPE_NAMES = ("fp32", "fp16", "bf16")
