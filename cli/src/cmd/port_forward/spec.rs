//! Port specs of `myco port-forward`: parsed in `mesh`, where the fuzz targets reach them.
pub use mesh::forward_spec::*;
