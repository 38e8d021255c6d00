//! api-rest's binary: the settings, then [`api_rest::run`].

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    api_rest::run(platform::config::load()).await
}
