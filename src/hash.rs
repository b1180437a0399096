//! hash (in progress)
