//! # comms-amqp: the AMQP transport and discovery plugin (work in progress)
