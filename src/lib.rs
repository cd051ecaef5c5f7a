pub mod nets;
