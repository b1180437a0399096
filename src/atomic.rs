//! atomic (in progress)
