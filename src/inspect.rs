//! inspect (in progress)
