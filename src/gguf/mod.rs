//! GGUF v2/v3 reader and streaming v3 writer.
//! OWNER: gguf/quant helper — being written.
