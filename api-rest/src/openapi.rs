//! The OpenAPI 3 document served at `/openapi.json`, generated from the handlers' annotations
//! and the types they exchange.

use utoipa::OpenApi;

use crate::error::{FieldError, Problem};
use crate::model::{Resource, ResourceInput, ResourcePage, SortKey};
use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "Kafkify resources API", description = "Every write also publishes an event (resource.created|updated|deleted) through the transactional outbox."),
    paths(routes::create, routes::list, routes::get, routes::replace, routes::delete),
    components(schemas(Resource, ResourceInput, ResourcePage, SortKey, Problem, FieldError)),
    tags((name = "resources", description = "Resources and their events"))
)]
pub struct ApiDoc;

pub fn json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}
