//! embedded (being written)
