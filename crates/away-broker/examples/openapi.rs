//! Print the broker's OpenAPI document (`cargo run -p away-broker --example openapi`).

fn main() {
    print!("{}", away_broker::api::openapi_document());
}
