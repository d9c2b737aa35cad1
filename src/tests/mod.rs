//! Tests that span several modules, kept out of the product's top level. A module's own tests
//! stay beside it (`jwks/validate/tests.rs`, `listener/tests.rs`, inline `mod tests`).

mod properties;
