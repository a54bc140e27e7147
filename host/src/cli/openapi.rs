//! `rmlx openapi`: prints the server's OpenAPI document (schemas/openapi.json).
use crate::config::Settings;
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args, _settings: &Settings) -> Result<()> {
    print!("{}", crate::api::openapi_json());
    Ok(())
}
