//! herald-analytics
