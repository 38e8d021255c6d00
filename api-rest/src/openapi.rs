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
    tags((name = "resources", description = "Resources and their events")),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// Every operation needs `Authorization: Bearer <API key>` and may answer 401.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            Http, HttpAuthScheme, SecurityRequirement, SecurityScheme,
        };
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        if let Some(components) = doc.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
        doc.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
        let unauthorized = ResponseBuilder::new()
            .description("No valid API key (Authorization: Bearer <key>)")
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build();
        for item in doc.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                op.responses
                    .responses
                    .insert("401".into(), unauthorized.clone().into());
            }
        }
    }
}

pub fn json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}
