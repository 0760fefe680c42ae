//! Shared helpers of the integration tests: finding the `vmnest` binary and the peers, making
//! patterned images, locating `../shared/sample_images`.
