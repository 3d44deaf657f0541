//! The pages the gateway serves to a browser: the echo page of `examples/clients` (`GET /echo`)
//! and its assets, compiled into the binary and sent under a strict Content-Security-Policy.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// What the pages may do: load their own scripts and styles, and talk to this gateway (fetch,
/// EventSource and WebSocket to the same origin); no inline code, no frames, no other origin.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// One file served as it is.
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

pub const HTML: &str = "text/html; charset=utf-8";
pub const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
pub const CSS: &str = "text/css; charset=utf-8";

/// `file` of examples/clients, served at `path`.
macro_rules! asset {
    ($path:literal, $content_type:expr, $file:literal) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_str!(concat!("../../examples/clients/", $file)),
        }
    };
}

/// The echo page and its assets; the page links them relatively, so they sit beside `/echo`.
const ASSETS: &[Asset] = &[
    asset!("/echo", HTML, "echo.html"),
    asset!("/echo.mjs", JAVASCRIPT, "echo.mjs"),
    asset!("/echo-core.mjs", JAVASCRIPT, "echo-core.mjs"),
    asset!("/echo.css", CSS, "echo.css"),
];

/// `GET` routes of every asset; they need no credential (the page asks for one).
pub fn routes() -> Router {
    routes_of(ASSETS)
}

/// `GET` routes of `assets`, each sent under the pages' policy (the console's too).
pub fn routes_of<S: Clone + Send + Sync + 'static>(assets: &'static [Asset]) -> Router<S> {
    assets.iter().fold(Router::new(), |router, asset| {
        router.route(asset.path, get(move || async move { serve(asset) }))
    })
}

fn serve(asset: &'static Asset) -> Response {
    let headers = [
        (header::CONTENT_TYPE, asset.content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // A credential given in the page's query string goes no further.
        (header::REFERRER_POLICY, "no-referrer"),
        // Revalidated on every load: a new gateway's page is never mixed with an old script.
        (header::CACHE_CONTROL, "no-cache"),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ];
    let mut response = asset.body.into_response();
    for (name, value) in headers {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Fails if `page` holds code [`CONTENT_SECURITY_POLICY`] would block: inline scripts, styles,
/// style attributes or event handlers.
#[cfg(test)]
pub(crate) fn assert_no_inline_code(page: &str) {
    assert!(!page.contains("<script>"), "scripts come from files");
    assert!(!page.contains("<style"), "styles come from files");
    assert!(!page.contains(" style=\""), "no inline style attributes");
    let handler = page.split(" on").skip(1).find(|rest| {
        let name_end = rest.find(|c: char| !c.is_ascii_lowercase()).unwrap_or(0);
        name_end > 0 && rest[name_end..].starts_with('=')
    });
    assert_eq!(handler, None, "no inline event handlers");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_links_is_served() {
        let page = ASSETS[0].body;
        let script = ASSETS[1].body;
        for linked in ["echo.css", "echo.mjs"] {
            assert!(page.contains(&format!("\"{linked}\"")), "{linked}");
        }
        assert!(script.contains("\"./echo-core.mjs\""));
        for path in ["/echo.css", "/echo.mjs", "/echo-core.mjs"] {
            assert!(ASSETS.iter().any(|asset| asset.path == path), "{path}");
        }
    }

    #[test]
    fn the_page_has_no_inline_code_the_policy_would_block() {
        assert_no_inline_code(ASSETS[0].body);
    }
}
