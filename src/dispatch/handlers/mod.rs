//! Built-in handlers, one file each. `enrich` covers the services' create_user, update_user and
//! start_task behaviour from the routes file alone.

pub mod enrich;
