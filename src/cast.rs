//! cast (in progress)
