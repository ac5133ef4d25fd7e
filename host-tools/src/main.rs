fn main() {
    println!("unipeer: work in progress");
}
