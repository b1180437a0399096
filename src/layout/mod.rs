//! Model families, layouts and key maps, loaded from `formats/*.toml`.
//! OWNER: layout helper — being written.
