//! # comms-redis: the Redis transport and discovery plugin (work in progress)
