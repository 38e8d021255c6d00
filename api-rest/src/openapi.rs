//! The OpenAPI 3 document served at `/openapi.json`, generated from the handlers' annotations
//! and the types they exchange.

use utoipa::OpenApi;

use crate::error::{FieldError, Problem};
use crate::model::{self, Resource, ResourceInput, ResourcePage, SortKey};
use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "Kafkify resources API", description = "Every write also publishes an event (resource.created|updated|deleted) through the transactional outbox."),
    paths(
        routes::create,
        routes::list,
        routes::head_list,
        routes::get,
        routes::head,
        routes::replace,
        routes::delete
    ),
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
                &mut item.head,
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
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    state_the_syntax(&mut doc);
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// What the annotations cannot say, said on the generated document, so that a client built
/// from it (or schemathesis' positive-data check) never builds a request the API refuses:
/// - a header or query parameter is absent or a string, never `null` (utoipa makes every
///   `Option<String>` parameter nullable, and `If-Match: null` is not a header we accept);
/// - `cursor` follows [`model::CURSOR_PATTERN`]; `updated_after` is an RFC 3339 time;
///   `name_prefix` has a name's length;
/// - attribute keys are 1–100 characters, values at most 1,000, at most 50 pairs.
fn state_the_syntax(doc: &mut serde_json::Value) {
    use serde_json::json;
    if let Some(paths) = doc["paths"].as_object_mut() {
        for operation in paths.values_mut().filter_map(|p| p.as_object_mut()) {
            for op in operation.values_mut() {
                let Some(params) = op["parameters"].as_array_mut() else {
                    continue;
                };
                for param in params {
                    let name = param["name"].as_str().unwrap_or_default().to_string();
                    let schema = &mut param["schema"];
                    if let Some(types) = schema["type"].as_array() {
                        let types: Vec<_> =
                            types.iter().filter(|t| *t != "null").cloned().collect();
                        schema["type"] = match types.as_slice() {
                            [one] => one.clone(),
                            _ => json!(types),
                        };
                    }
                    match name.as_str() {
                        "cursor" => schema["pattern"] = json!(model::CURSOR_PATTERN),
                        "updated_after" => schema["format"] = json!("date-time"),
                        "name_prefix" => schema["maxLength"] = json!(model::NAME_MAX),
                        _ => {}
                    }
                }
            }
        }
    }
    let attributes = &mut doc["components"]["schemas"]["ResourceInput"]["properties"]["attributes"];
    attributes["maxProperties"] = json!(model::ATTRIBUTES_MAX);
    attributes["propertyNames"] =
        json!({"type": "string", "minLength": 1, "maxLength": model::ATTRIBUTE_KEY_MAX});
    attributes["additionalProperties"] =
        json!({"type": "string", "maxLength": model::ATTRIBUTE_VALUE_MAX});
}
